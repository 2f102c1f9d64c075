"""Offline training: self-supervised pretraining, few-label transfer, studies and export (torch)."""
