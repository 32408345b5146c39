"""speech_kd: frame-level knowledge distillation of CTC acoustic models for SpeechBrain."""
