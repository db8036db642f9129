"""The bundled toy teacher: a tiny SDXL-architecture checkpoint trained on handwritten digits (see teacher.json and
benchmarks/toy/train_teacher.py). It is an ordinary sgm single file and loads through ``load_sdxl``."""
