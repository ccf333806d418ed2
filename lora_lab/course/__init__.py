"""The course: what the notebooks use on top of the library (numeric helpers, widgets, exercise checkers, the tour)."""
