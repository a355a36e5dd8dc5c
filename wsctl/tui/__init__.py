"""`wsctl top`: the Textual dashboard. Import ``wsctl.tui.app`` only when the dashboard runs, so that
``wsctl``'s other commands never load Textual."""
