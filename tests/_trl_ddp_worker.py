"""One rank of the data-parallel TRL check in tests/test_integrations_trl.py (``python -m tests._trl_ddp_worker RANK
WORLD PORT OUT``, with FASTGRAD_TRL_TRAINER=trl or fastgrad): accelerate reads the torch.distributed environment,
each rank generates and trains on its share of the prompts, DDP averages the gradients; rank 0 saves the logged
steps and the parameter updates."""
import os
import sys

import torch


def main(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), HF_HUB_OFFLINE="1")
    import trl

    from fastgrad.integrations.trl import GRPOTrainer

    from . import _trl_tiny as tiny
    from ._launch import exit_skipping_shutdown

    which = os.environ["FASTGRAD_TRL_TRAINER"]
    cls = GRPOTrainer if which == "fastgrad" else trl.GRPOTrainer
    model = tiny.model_from(os.environ["FASTGRAD_TRL_MODEL"])
    args = tiny.config(os.path.join(out, which), per_device_train_batch_size=2, num_generations=4,
                       loss_type=os.environ.get("FASTGRAD_TRL_LOSS", "dapo"), ddp_backend="gloo")
    trainer = cls(model=model, reward_funcs=tiny.reward, args=args, train_dataset=tiny.dataset(),
                  processing_class=tiny.tokenizer())
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    trainer.train()
    assert trainer.accelerator.num_processes == world, trainer.accelerator.num_processes
    if rank == 0:
        steps = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
        torch.save({"steps": steps, "updates": {k: p.detach() - before[k] for k, p in model.named_parameters()},
                    "path": getattr(trainer, "fastgrad_path", None)}, os.path.join(out, f"{which}.pt"))
    # accelerate never destroys the gloo group it created, and the DDP-wrapped model still holds it after
    # destroy_process_group: its gloo threads would meet the interpreter's shutdown and can abort the rank with
    # "terminate called without an active exception" after the run (1 in 20 runs here; docs/distributed.md).
    # Leave without that shutdown once every rank is done and the results are written.
    trainer.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
    exit_skipping_shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
