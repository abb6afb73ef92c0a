"""The side-by-side benchmark (issue 5); run it with bench/run."""
