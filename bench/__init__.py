"""effkern benchmark harness: `python -m bench --help`; method and results in bench/NOTES.md."""
