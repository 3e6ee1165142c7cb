"""Shared scale searches (weighted least squares over candidate scales) the format families call."""
