"""The PyTorch DDP tutorial series' multigpu_torchrun.py, ported to shoal by
changing the constructor, with snapshots that resume (model, optimizer, epoch).

    shoal run -n 2 examples/multigpu_torchrun.py 4 1               # total epochs, save every
    shoal run -n 2 examples/multigpu_torchrun.py 6 1               # again: resumes from the snapshot
    shoal run -n 2 --servers 1 examples/multigpu_torchrun.py 4 1 --strategy parameter_server

What changed from the original: `shoal.init()` instead of `init_process_group`;
the strategy's `prepare` instead of `DDP(...)`; `strategy.loader` instead of a
DataLoader with a DistributedSampler (it keeps `.sampler.set_epoch`, and
`next(iter(loader))`, used to read the batch size, takes nothing from the
epoch); the snapshot through `strategy.full_state_dict` (every rank calls it,
rank 0 writes it), which carries the optimizer's state under every strategy.
"""

import argparse
import os

import torch
import torch.nn.functional as F  # noqa: N812  (the original's name)
from torch.utils.data import Dataset

import shoal


class MyTrainDataset(Dataset):
    def __init__(self, size):
        gen = torch.Generator().manual_seed(0)
        self.size = size
        self.data = [(torch.rand(20, generator=gen), torch.rand(1, generator=gen)) for _ in range(size)]

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return self.data[index]


class Trainer:
    def __init__(self, model, train_set, optimizer, strategy, batch_size, save_every, snapshot_path):
        self.global_rank = int(os.environ.get("RANK", "0"))
        self.strategy = strategy
        self.model, self.optimizer = strategy.prepare(model, optimizer)
        self.train_data = strategy.loader(train_set, batch_size=batch_size, shuffle=True)
        self.save_every = save_every
        self.snapshot_path = snapshot_path
        self.epochs_run = 0
        self.steps = 0
        if os.path.exists(snapshot_path):
            print("Loading snapshot")
            self._load_snapshot(snapshot_path)

    def _load_snapshot(self, snapshot_path):
        snapshot = torch.load(snapshot_path, weights_only=True)
        self.strategy.load_full_state_dict(self.model, snapshot["STATE"], self.optimizer)
        self.epochs_run = snapshot["EPOCHS_RUN"]
        print(f"Resuming training from snapshot at Epoch {self.epochs_run}")

    def _run_batch(self, source, targets):
        self.optimizer.zero_grad()
        output = self.model(source)
        loss = F.mse_loss(output, targets)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        return loss.item()

    def _run_epoch(self, epoch):
        b_sz = len(next(iter(self.train_data))[0])
        print(f"[GPU{self.global_rank}] Epoch {epoch} | Batchsize: {b_sz} | Steps: {len(self.train_data)}")
        self.train_data.sampler.set_epoch(epoch)
        for source, targets in self.train_data:
            loss = self._run_batch(source, targets)
        return loss

    def _save_snapshot(self, epoch):
        state = self.strategy.full_state_dict(self.model, self.optimizer)  # collective: every rank
        if self.global_rank == 0:
            torch.save({"STATE": state, "EPOCHS_RUN": epoch + 1}, self.snapshot_path)
            print(f"Epoch {epoch} | Training snapshot saved at {self.snapshot_path}")

    def train(self, max_epochs):
        for epoch in range(self.epochs_run, max_epochs):
            loss = self._run_epoch(epoch)
            if epoch % self.save_every == 0 or epoch == max_epochs - 1:
                self._save_snapshot(epoch)
        print(f"[GPU{self.global_rank}] ran {self.steps} steps, last loss {loss:.6f}", flush=True)


STRATEGIES = {
    "data_parallel": lambda: shoal.DataParallel(),
    "sharded": lambda: shoal.ShardedDataParallel(),
    "parameter_server": lambda: shoal.ParameterServer(consistency="bsp"),
}


def main():
    parser = argparse.ArgumentParser(description="simple distributed training job")
    parser.add_argument("total_epochs", type=int, help="Total epochs to train the model")
    parser.add_argument("save_every", type=int, help="How often to save a snapshot")
    parser.add_argument("--batch_size", default=32, type=int, help="Input batch size on each device (default: 32)")
    parser.add_argument("--snapshot", default="snapshot.pt")
    parser.add_argument("--strategy", default="data_parallel", choices=sorted(STRATEGIES))
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    args = parser.parse_args()

    shoal.init()
    torch.manual_seed(0)
    train_set = MyTrainDataset(2048)
    model = torch.nn.Linear(20, 1)
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = Trainer(
        model, train_set, optimizer, STRATEGIES[args.strategy](), args.batch_size, args.save_every, args.snapshot
    )
    trainer.train(args.total_epochs)
    shoal.shutdown()


if __name__ == "__main__":
    main()
