"""The speech LLM: its parts as plain modules (parts: tapped Whisper states, the connector, audio merged into
the LLM's embeddings), `DestaConfig` and `DestaModel` (modeling), the processor that turns chat turns and audio
into its inputs (processing), packed rows (packing), where the bases load from (bases), building and loading
both (loading), tiny random bases for tests and smoke runs (tiny), and the converter of the official
DeSTA2/2.5 releases (convert)."""
