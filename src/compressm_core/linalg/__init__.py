"""Linear algebra beyond the Array API standard, behind one fallback ladder."""

from ._delegation import eig, solve_discrete_lyapunov_host

__all__ = ["eig", "solve_discrete_lyapunov_host"]
