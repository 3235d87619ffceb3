"""Training for compression (issue 9): the student learns from the teacher what a cut or a rounding took away.

student   the EfficientNet-Lite0 module, loaded from the pinned weights; channel pruning in PyTorch
augment   views of a few hundred photos: random resized crops, flips, then mixup/cutmix per batch
teacher   a pool of augmented views with the teacher's logits cached once (the teacher is 1/3 of a step)
loss      alpha * CE + (1 - alpha) * tau^2 * KL, the CE term only where a label exists
loop      the step/time-budgeted loop: progress with an ETA, checkpoints so a build resumes
export    the trained module to the build's FP32 NCHW ONNX graph
distill   the build stage's glue: prune, train on the pool, export
qat       quantization-aware training: fake quantization where ORT's quantizer puts it, trained on the pool
"""
