"""CvT weights in every format: `read` (any supported file -> `Checkpoint`), `load` (strictly into a
model), `export` (official, safetensors, Hugging Face), `hf_preprocessor` (the test transform in
Hugging Face's terms)."""
