"""The running service: options (:mod:`.options`), config to components
(:mod:`.builder`), the ordered service tree (:mod:`.tree`, :mod:`.service`) and
the listeners (:mod:`.listen`). ``twistd hsmocsp`` enters through :mod:`hsmocsp.tap`.
"""
