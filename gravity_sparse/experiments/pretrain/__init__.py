"""Pretraining a gravity model from scratch (`gravity-sparse pretrain`): config, training, plot, model card."""
