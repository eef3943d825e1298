"""The speech LLM: `DestaConfig` and `DestaModel` (modeling), the processor that turns chat turns and audio
into its inputs (processing), building and loading both (loading), tiny random bases for tests and smoke
runs (tiny), and the converter of the official DeSTA2/2.5 releases (convert)."""
