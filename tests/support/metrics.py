"""Scraping `/metrics` the way Prometheus does, through Django's test client, and reading the
samples: tests compare a value after something happened with the value before."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

TOKEN = "metrics-token-for-tests-Vq7Lp2Xw9Rz4"


class Scrape:
    """One scrape's samples, by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, tuple], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 when the series does not exist (yet)."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, tuple(sorted(labels.items()))) in self.samples

    def label_values(self, name: str, label: str) -> set[str]:
        """Every value `label` takes among the samples called `name`."""
        return {
            dict(labels)[label]
            for sample_name, labels in self.samples
            if sample_name == name and label in dict(labels)
        }


def scrape(client, settings) -> Scrape:
    """`GET /metrics` with the metrics token (set for the test)."""
    settings.B24_METRICS_TOKEN = TOKEN
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200, response.content[:500]
    return Scrape(response.content.decode())


def moved(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    """How much a counter (or a histogram's `_count`) grew between two scrapes."""
    return after.value(name, **labels) - before.value(name, **labels)
