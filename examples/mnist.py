"""pytorch/examples' mnist/main.py, ported to shoal by changing the constructor
(on scikit-learn's 8x8 digits, so nothing is downloaded; the Net is sized for 8x8).

    shoal run -n 2 examples/mnist.py --strategy data_parallel --save-model
    shoal run -n 2 --servers 1 examples/mnist.py --strategy parameter_server
    shoal run -n 2 examples/mnist.py --strategy pipeline
    python examples/mnist.py                                      # one process, same code

What changed from the original, and nothing else: `shoal.init()`; the strategy's
`prepare` and `loader`; under the pipeline, `model(data, target)` returns the
loss (the schedule runs forward and backward); saving through
`strategy.full_state_dict`, which loads into the plain `Net` under every strategy.
The test set is evaluated by each rank on its own, as the original does.
"""

import argparse

import torch
import torch.nn.functional as F  # noqa: N812  (the original's name)
from torch import nn, optim
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader

import shoal
from shoal.data.digits import Digits


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(256, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def train(args, model, train_loader, optimizer, epoch, pipelined):
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        optimizer.zero_grad()
        loss = model(data, target) if pipelined else F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        if batch_idx % args.log_interval == 0 and shoal.current().is_main:
            print(f"Train Epoch: {epoch} [{batch_idx}/{len(train_loader)}]\tLoss: {loss.item():.6f}", flush=True)
        if args.dry_run:
            break


def test(model, test_loader):
    model.eval()
    test_loss = 0
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            pred = output.argmax(dim=1, keepdim=True)
            correct += pred.eq(target.view_as(pred)).sum().item()
    test_loss /= len(test_loader.dataset)
    accuracy = correct / len(test_loader.dataset)
    print(f"Test set: Average loss: {test_loss:.4f}, Accuracy: {correct}/{len(test_loader.dataset)} ({accuracy:.4f})")
    return accuracy


STRATEGIES = {
    "data_parallel": lambda: shoal.DataParallel(),
    "sharded": lambda: shoal.ShardedDataParallel(),
    "parameter_server": lambda: shoal.ParameterServer(consistency="bsp"),
    "pipeline": lambda: shoal.Pipeline(stages=shoal.current().world_size, microbatches=2, loss_fn=F.nll_loss),
    "tensor_parallel": lambda: shoal.TensorParallel(),
}


def main():
    parser = argparse.ArgumentParser(description="PyTorch MNIST Example, on shoal")
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=0.7)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--save-model", action="store_true")
    parser.add_argument("--model-path", default="mnist_cnn.pt")
    parser.add_argument("--strategy", default="data_parallel", choices=sorted(STRATEGIES))
    args = parser.parse_args()

    rt = shoal.init()
    torch.manual_seed(args.seed)
    data = Digits().load(seed=0)
    test_loader = DataLoader(data.test, batch_size=1000)

    model = Net()
    optimizer = optim.Adadelta(model.parameters(), lr=args.lr)
    strategy = STRATEGIES[args.strategy]()
    model, optimizer = strategy.prepare(model, optimizer)
    train_loader = strategy.loader(data.train, batch_size=args.batch_size, shuffle=True, seed=args.seed)

    scheduler = StepLR(optimizer, step_size=1, gamma=args.gamma)
    for epoch in range(1, args.epochs + 1):
        train(args, model, train_loader, optimizer, epoch, pipelined=args.strategy == "pipeline")
        accuracy = test(model, test_loader)
        scheduler.step()

    if args.save_model:
        state = strategy.full_state_dict(model)  # every rank calls it; every rank gets the whole model
        if rt.is_main:
            torch.save(state["model"], args.model_path)
            plain = Net()  # the file loads into the plain model, as the original's does
            plain.load_state_dict(torch.load(args.model_path, weights_only=True))
            print(f"saved {args.model_path}; reloaded into a plain Net: accuracy {test(plain, test_loader):.4f}")
    print(f"final accuracy {accuracy:.4f}", flush=True)
    shoal.shutdown()


if __name__ == "__main__":
    main()
