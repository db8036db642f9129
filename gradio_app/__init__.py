"""The Gradio app (train, watch, compare teacher against student, generate) will live here, as a thin layer over
``trainer`` (``trainer.train.train`` with a ``StopFlag`` from a background thread, ``trainer.generate``). It is not
built yet: no issue has covered it so far."""
