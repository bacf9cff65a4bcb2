"""odmt-t4r: ODMT (Ji et al., ACM MM 2023) as a Merlin system: NVTabular ETL, Transformers4Rec model, Triton serving."""

__version__ = "0.1.0"
