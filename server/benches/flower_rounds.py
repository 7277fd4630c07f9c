"""The federated round benchmark's workload on Flower's simulation engine.

Usage: python flower_rounds.py PARAMETERS CLIENTS ROUNDS

Every round, each of CLIENTS simulated clients receives the float32 model of
PARAMETERS elements, applies w <- 0.999 w + 1e-3 (client + 1) and returns it;
FedAvg averages them. Prints `SECONDS_PER_ROUND <best round>`, timed between
the ends of consecutive aggregations (the first round warms up). Needs
`pip install "flwr[simulation]"`; called by `cargo bench --bench federated`
when PS_FLOWER_PYTHON names that interpreter.
"""

import logging
import sys
import time

import flwr as fl
import numpy as np
from flwr.common import ndarrays_to_parameters


class ShiftClient(fl.client.NumPyClient):
    def __init__(self, client: int):
        self.client = client

    def fit(self, parameters, config):
        shift = np.float32(1e-3 * (self.client + 1))
        return [parameters[0] * np.float32(0.999) + shift], 1, {}


class TimedFedAvg(fl.server.strategy.FedAvg):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.ends = []

    def aggregate_fit(self, server_round, results, failures):
        aggregated = super().aggregate_fit(server_round, results, failures)
        self.ends.append(time.perf_counter())
        return aggregated


def main() -> None:
    parameters, clients, rounds = (int(a) for a in sys.argv[1:4])
    logging.getLogger("flwr").setLevel(logging.ERROR)
    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=clients,
        min_available_clients=clients,
        initial_parameters=ndarrays_to_parameters([np.zeros(parameters, dtype=np.float32)]),
    )
    fl.simulation.start_simulation(
        client_fn=lambda cid: ShiftClient(int(cid)).to_client(),
        num_clients=clients,
        config=fl.server.ServerConfig(num_rounds=rounds + 1),
        strategy=strategy,
        client_resources={"num_cpus": 1},
        ray_init_args={"include_dashboard": False, "log_to_driver": False},
    )
    gaps = [b - a for a, b in zip(strategy.ends, strategy.ends[1:])]
    print(f"SECONDS_PER_ROUND {min(gaps):.4f}", flush=True)


if __name__ == "__main__":
    main()
