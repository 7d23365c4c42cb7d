"""Deployment: export a checkpoint (ONNX, torch.export, int8 ONNX), prune it, measure what ships."""
