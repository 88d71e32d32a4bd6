"""Pre-training objectives: AIMv1's next-patch regression, AIMv2's multimodal loss, patch orders."""
