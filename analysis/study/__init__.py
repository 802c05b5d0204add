"""The reproduction study behind `attnmed reproduce`: the pipeline (`reproduce`), the run-folder readers
(`rundata`) and the report (`report`).
"""
