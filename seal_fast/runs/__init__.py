"""Running many training runs and reading their results: sweep, report (the runs table), study_page."""
