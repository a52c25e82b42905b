"""Stand-in for DVCLive on a machine without dvc (DVCLive imports it): the same metrics.json and
plots/metrics/NAME.tsv files, for bench/device/runner.py only."""
import json
import os


class Live:
    def __init__(self, dir, **_):
        self.dir, self.step, self.rows = dir, 0, {}
        os.makedirs(os.path.join(dir, "plots", "metrics"), exist_ok=True)

    def log_metric(self, name, value):
        self.rows[name] = value
        path = os.path.join(self.dir, "plots", "metrics", f"{name}.tsv")
        new = not os.path.exists(path)
        with open(path, "a") as f:
            if new:
                f.write(f"step\t{name}\n")
            f.write(f"{self.step}\t{value}\n")

    def next_step(self):
        with open(os.path.join(self.dir, "metrics.json"), "w") as f:
            json.dump({"step": self.step, **self.rows}, f)
        self.step += 1

    def end(self):
        pass
