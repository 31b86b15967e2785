"""report: report.md with the tables and plots of every finished stage (report, stage)."""
