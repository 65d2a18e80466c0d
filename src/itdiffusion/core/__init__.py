"""The math core: channel, spectrum, grid, proposal, noise, errors and estimators (torch and numpy only)."""
