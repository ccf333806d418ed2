"""Experiments, in import order: pretrained bases; the chosen defaults; the one estimator; reports (tables, CSV,
figures); the one fine-tuning pipeline; the run cache; the fair-comparison protocol; the studies the chapters
run; and cost counts and scale-out measurements."""
