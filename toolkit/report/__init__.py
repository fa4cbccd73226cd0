"""The comparison report: statistics, markdown and charts."""
