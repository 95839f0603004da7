"""`lmforge webui`: a Gradio page (as LLaMA Board) that trains, chats and exports through lmforge's own commands."""
