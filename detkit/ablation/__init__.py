"""Ablation studies: tables of experiments (`tables`), the sweep that trains every row for
several seeds (`sweep`), and the report beside the papers' numbers (`report`)."""
from detkit.ablation.tables import AblationRow, AblationTable, load_table, paper_table_names, table_names

__all__ = ["AblationRow", "AblationTable", "load_table", "paper_table_names", "table_names"]
