"""Modal screens: confirmations and forms."""
