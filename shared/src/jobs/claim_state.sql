-- Why a claim found nothing: the job's state and when it is due.
SELECT status, run_after, run_after <= now() AS due FROM generation_jobs WHERE id = $1
