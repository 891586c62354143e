"""The running node, one module per stage of the data flow: receiver -> assembler -> processor ->
pipeline -> sender, with its store (spool and journal), configuration, metrics and HTTP endpoints;
``app`` wires them together."""
