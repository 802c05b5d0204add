"""attnmed analysis: redundancy metrics, collection, schedules, evaluation, plots and the reproduction pipeline."""
