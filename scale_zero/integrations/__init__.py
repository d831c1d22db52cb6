"""SCALE inside other people's training loops: `scale_zero.integrations.hf` (the Hugging Face
Trainer). Accelerate needs no adapter: `accelerator.prepare(model, SCALE(...), loader)`
works with the DeepSpeed and the FSDP2 plugins (docs/integrations.md). Importing this
package loads nothing; `hf` imports transformers."""
