"""Modal dialogs: plans to confirm and the forms that ask for what an operation needs.

They sit below the widgets and screens that open them (tui.app > tui.screens > tui.widgets >
tui.modals > tui.core) and import neither.
"""
