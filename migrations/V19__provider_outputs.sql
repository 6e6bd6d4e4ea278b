-- A provider job a check found finished is handed to a worker to collect (download, store,
-- complete). Its output's URLs are kept on the job from then on, so that the collection no
-- longer hangs on one message arriving in time: any worker message finds them, whenever no
-- collection is under way; a check that falls due meanwhile sends another message instead of
-- asking the provider again; and a collection that fails on the way (a CDN's 503) is tried
-- again from them, not from a fresh check the provider's deadline may already refuse.
ALTER TABLE generation_jobs ADD COLUMN provider_outputs text[];
