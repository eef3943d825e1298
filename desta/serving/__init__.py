"""Front-ends for a trained model: the engine that answers one conversation (streamed or not), `desta chat`
(the shell), `desta serve` (an OpenAI-compatible API) and `desta app` (a web page). All three give the model
the turns it was trained with: the same system prompt, one audio placeholder per clip."""
