"""The built-in tasks: the demo (demo.py) and the zoo (zoo.py: arith, sort, json, recall), each with its
generator and its checker (checkers.py: data.checker). The package ships no data: a task's files are generated
on first use into the cache (files.py), byte for byte the same on every machine, so their fingerprints and the
runs trained on them do not depend on where they were made."""
