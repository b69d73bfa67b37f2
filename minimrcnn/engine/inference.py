"""Run a model over a dataset and collect its predictions, image by image."""

from __future__ import annotations

import torch


def _prediction_to_cpu(prediction: dict) -> dict:
    return {name: value.detach().cpu() if torch.is_tensor(value) else value
            for name, value in prediction.items()}


@torch.no_grad()
def predict_dataset(model, dataset, device="cpu", batch_size: int = 8, progress: bool = False,
                    indices=None) -> list[tuple[int, dict]]:
    """Predictions of ``model`` on ``dataset`` (or on its items ``indices``).

    dataset: yields ``(image [3, H, W] float in [0, 1], target)`` with ``target["image_id"]``,
        as ``minimrcnn.data.CocoInstances`` does (no resizing needed: the model resizes).
    Returns ``[(image_id, prediction), ...]`` in dataset order, each prediction a dict of
    CPU tensors as ``model.predict`` gives them: boxes [D, 4] xyxy in original image
    coordinates, labels [D], scores [D], masks [D, H, W] bool. The model is run in eval
    mode and given back in the mode it came in.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    indices = list(range(len(dataset))) if indices is None else list(indices)
    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(indices), desc="predict", unit="img")
    outputs = []
    try:
        for start in range(0, len(indices), batch_size):
            samples = [dataset[i] for i in indices[start:start + batch_size]]
            images = [image.to(device) for image, _ in samples]
            predictions = model.predict(images)
            for (_, target), prediction in zip(samples, predictions):
                outputs.append((int(target["image_id"]), _prediction_to_cpu(prediction)))
            if bar is not None:
                bar.update(len(samples))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return outputs
