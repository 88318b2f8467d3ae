"""Microbenchmarks behind `rellax-fast bench`."""
