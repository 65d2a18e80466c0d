"""Reporting: tables, figures and the report of several runs."""
