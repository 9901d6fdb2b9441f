"""Widgets of the dashboard: the domains table and the lower panes."""
