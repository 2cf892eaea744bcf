"""The model and everything that reads or writes its weights: the config's model section
(config), the book's GPT, also in Llama's shape (gpt), its head + cross-entropy
kernel (head_loss), the Hugging Face GPT-2 and book name maps (gpt2), the Hugging Face
Llama name map (llama_hf), reading a checkpoint's weights (checkpoints), resolving any
model source (weights), safetensors read defensively (tensorfile), an export's model
card (card) and the GGUF file of llama.cpp and Ollama (gguf_file).

Must not know: training (optimizers, the loop, the training state in a checkpoint) or
data. Imports only core/ and the config.
"""
