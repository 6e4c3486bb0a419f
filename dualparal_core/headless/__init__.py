"""The headless CLI's parts: the flags and their checks (no torch), the run, the progress bars, the text encoding."""
