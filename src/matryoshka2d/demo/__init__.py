"""The demo: the seeds' experiment (:mod:`.experiment`) and its report (:mod:`.report`)."""
