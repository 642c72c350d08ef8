"""Work the server does on stored data: fine-tuning jobs (each in its own process) and evaluations.

- :mod:`.service`      ``JobService``: submit / get / list / cancel / view (request checks, the job's TrainConfig)
- :mod:`.scheduler`    ``JobScheduler``: the thread that owns the job slots, starts, follows and stops job processes
- :mod:`.launcher`     starting job processes (fork server or subprocess), signalling their process groups
- :mod:`.worker`       the job process itself (``python -m acecal.jobs.worker <job_dir>/spec.json``)
- :mod:`.folder`       the job folder's files and exit statuses: what a job process and the server exchange
- :mod:`.recovery`     settling a job whose process ended or whose server died; recovery at start
- :mod:`.evaluations`  ``EvaluationService``: a model on a stored dataset, run at once on the device queue

Imports :mod:`acecal.storage` and the training code, never the HTTP layer. This package's ``__init__`` imports
nothing: a job process starts from :mod:`.worker` without the server's modules.
"""
