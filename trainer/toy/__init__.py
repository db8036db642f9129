"""The toy proof: a tiny SDXL-architecture teacher trained on scikit-learn's handwritten digits, the evaluator that
scores samples (toy FID, prompt accuracy, diversity) and the teacher sampler. See benchmarks/toy/NOTES.md."""
