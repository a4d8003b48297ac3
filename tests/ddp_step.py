"""One training step's loss and gradients, for tests/test_train_dist.py; run in-process or as a
torchrun-style rank (RANK/WORLD_SIZE/MASTER_* in the environment): `python tests/ddp_step.py DATA OUT`."""
import sys

import torch


def step_gradients(data, accum_steps: int, batch_size: int = 16, step: int = 3) -> dict:
    from mmsearch.config import ModelSpec
    from mmsearch.towers.encoder import load_encoder
    from mmsearch.train import distributed as dist_
    from mmsearch.train.data import BatchPlan, StepBatches, open_source
    from mmsearch.train.precision import Precision
    from mmsearch.train.step import clip_loss, contrastive_backward, tower_features

    cpu = torch.device("cpu")
    world = dist_.start(cpu)
    enc = load_encoder(ModelSpec(model="mmsearch-tiny", pretrained=None))
    model = enc.model.train()
    source = open_source(data, "train")
    plan = BatchPlan(len(source), batch_size, seed=0, world_size=world.world_size, accum_steps=accum_steps)
    batch = StepBatches(source, enc.preprocess_train, plan, world.rank, 64)[step]
    tokens = enc.tokenize(batch["texts"])
    m = plan.micro_size
    micro = [(batch["pixels"][j:j + m], tokens[j:j + m]) for j in range(0, plan.local_size, m)]
    loss = contrastive_backward(tower_features(enc), micro, model.logit_scale,
                                clip_loss(world.rank, world.world_size), Precision.create("fp32", cpu))
    params = dict(model.named_parameters())
    dist_.average_gradients(list(params.values()), world)
    loss = dist_.all_sum([loss], world, cpu)[0] / world.world_size
    return {"loss": loss, "rank": world.rank, "grads": {k: p.grad.clone() for k, p in params.items()}}


if __name__ == "__main__":
    torch.set_num_threads(1)
    results = [step_gradients(sys.argv[1], accum) for accum in (1, 2)]
    if results[0]["rank"] == 0:
        torch.save(results, sys.argv[2])
