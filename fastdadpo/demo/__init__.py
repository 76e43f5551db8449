"""The embedded demo: a synthetic task with verifiable answers, tiny models built offline, the demo
command that runs the whole recipe on them, and its report over seeds."""
