"""Data: built-in toy and digits sets, image folders, arrays and the CIFAR-10 archive."""
