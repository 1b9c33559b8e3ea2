# peft imports bitsandbytes, which on a CPU with AVX512-BF16 tries to fetch an optional kernel from the Hugging Face
# hub and warns when it cannot (its built-in CPU kernels are used either way). Here, before any script's import of it.
import logging

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
