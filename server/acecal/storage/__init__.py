"""Durable state of the server and of training runs: files written atomically, the SQLite state database, inference
results, stored datasets.

Nothing here imports the HTTP layer, the job runner, torch or SimpleITK at module level; ``acecal.storage.files``
is stdlib-only so every layer (training checkpoints, job processes, the server) writes files the same way.
"""
